"""launch/xm_launch.py: sweep expansion, work-unit workdirs, argument quoting, CLI errors, JobSet
rendering through launch/gke, and (with an XManager environment) real local launches.

The XManager tests run only when ``LCM_XM_PYTHON`` names the python of an environment made with
``pip install -r launch/requirements-xm.txt`` (XManager cannot share .venv: it pins protobuf < 7).
"""

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml

from launch import xm_launch as xl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "xm_launch.py")
XM_PYTHON = os.environ.get("LCM_XM_PYTHON", "")
needs_xm = pytest.mark.skipif(not XM_PYTHON, reason="set LCM_XM_PYTHON to an XManager env's python")


def _cli(*args, python=sys.executable, timeout=60, cwd=None):
  return subprocess.run([python, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                        cwd=cwd or ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ------------------------------------------------------------------------------------------------
# Pure functions

def test_sweep_is_the_cartesian_product_in_product_order():
  axes = xl.parse_sweep("optimizer.lr=1e-3,3e-4; config.seed=0,1,2")
  assert axes == [("config.optimizer.lr", ["1e-3", "3e-4"]), ("config.seed", ["0", "1", "2"])]
  points = xl.expand_sweep(axes)
  expected = [{"config.optimizer.lr": lr, "config.seed": s}
              for lr in ("1e-3", "3e-4") for s in ("0", "1", "2")]
  assert points == expected
  assert xl.expand_sweep(xl.parse_sweep("")) == [{}]


def test_sweep_escapes_keep_commas_and_semicolons_in_values():
  axes = xl.parse_sweep(r"data.train=/a:0.7\,/b:0.3,/c;model.family=x\;y")
  assert axes == [("config.data.train", ["/a:0.7,/b:0.3", "/c"]), ("config.model.family", ["x;y"])]


@pytest.mark.parametrize("spec, words", [
    ("optimizer.lr", "has no '='"),
    ("optimizer.lr=1e-3,", "empty value"),
    ("optimizer.lr=1e-3;;seed=1", "empty axis"),
    ("optimizer.lr=1;config.optimizer.lr=2", "appears twice"),
    ("optimizer..lr=1", "bad config key"),
    ("1lr=1", "bad config key"),
])
def test_bad_sweeps_raise_with_the_reason(spec, words):
  with pytest.raises(xl.LaunchError, match=words):
    xl.parse_sweep(spec)


def test_plan_gives_one_workdir_per_work_unit_and_the_point_in_its_args():
  units = xl.plan("configs/mse_1b6.py:tiny", "/r", "exp", "optimizer.lr=1e-3,3e-4;seed=0,1",
                  ["--config.train.num_steps=2"])
  assert [u.wid for u in units] == [1, 2, 3, 4]
  assert [u.workdir for u in units] == [f"/r/exp/{i}" for i in (1, 2, 3, 4)]
  for u in units:
    assert u.args[:2] == ["--config=configs/mse_1b6.py:tiny", f"--workdir={u.workdir}"]
    overrides = dict(a[2:].split("=", 1) for a in u.args[2:])
    assert overrides == {"config.train.num_steps": "2", **u.overrides}
  assert [u.overrides["config.seed"] for u in units] == ["0", "1", "0", "1"]
  # URL roots keep '/' separators.
  [u] = xl.plan("c.py", "gs://bucket/runs/", "exp")
  assert u.workdir == "gs://bucket/runs/exp/1" and u.overrides == {}


def test_plan_refuses_a_key_both_swept_and_fixed_and_bad_fixed_overrides():
  with pytest.raises(xl.LaunchError, match="both swept and fixed"):
    xl.plan("c.py", "/r", "e", "seed=0,1", ["--config.seed=3"])
  with pytest.raises(xl.LaunchError, match="must look like --config.KEY=VALUE"):
    xl.plan("c.py", "/r", "e", "", ["--workdir=/x"])
  with pytest.raises(xl.LaunchError, match="--name"):
    xl.plan("c.py", "/r", "a/b")


def test_shell_command_survives_a_real_shell(tmp_path):
  """The printed command, run by /bin/sh, hands the program exactly the intended argv."""
  echo = tmp_path / "echo args"  # a space in the interpreter path too
  echo.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                  "'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
  echo.chmod(0o755)
  args = ["--config=configs/x.py:tiny", "--workdir=/w/it's here/1",
          '--config.data.train=/a b:0.5,"/c";$HOME`x`', "--config.k=*"]
  out = subprocess.run(["/bin/sh", "-c", xl.shell_command(str(echo), args)], capture_output=True,
                       text=True, check=True, cwd=tmp_path).stdout
  assert json.loads(out) == ["-m", "lcm_jax.main", *args]


def test_k8s_names_are_dns_labels():
  assert xl.k8s_name("LR_sweep.v2", 3) == "lr-sweep-v2-3"
  assert xl.k8s_name("1run", 1) == "x1run-1"
  long = xl.k8s_name("a" * 80, 12)
  assert len(long) <= 53 and long.endswith("-12")


def test_the_launcher_imports_no_jax_lcm_jax_or_xmanager():
  code = ("import sys; import launch.xm_launch; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'lcm_jax', 'xmanager'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout
  assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# CLI without XManager (dry runs, errors, JobSets)

@pytest.mark.parametrize("args, words", [
    (["--sweep=optimizer.lr"], "has no '='"),
    (["--sweep=optimizer.lr=1,,2"], "empty value"),
    (["--name=a/b"], "--name 'a/b'"),
    (["--sweep=seed=0,1", "--", "--config.seed=2"], "both swept and fixed"),
    (["--", "--mode=describe"], "--config.KEY=VALUE"),
    (["--bogus=1"], "unrecognized arguments: --bogus=1"),
    (["--executor=kubernetes", "--root=/r"], "needs --image"),
    (["--executor=kubernetes", "--image=i", "--root=rel/dir"], "shared path"),
    (["--executor=jobset", "--root=/r", "--gke_args=--image=x"], "starting with 'tpu' or 'gpu'"),
])
def test_cli_errors_exit_2_with_one_error_line(args, words):
  proc = _cli("--config=configs/mse_1b6.py:tiny", "--dry_run", *args)
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and words in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_dry_run_prints_every_work_unit_command():
  proc = _cli("--config=configs/mse_1b6.py:tiny", "--root=/tmp/r", "--name=e", "--dry_run",
              "--python=/p/python", "--sweep=optimizer.lr=1e-3,3e-4", "--",
              "--config.train.num_steps=2")
  assert proc.returncode == 0, proc.stderr
  cmds = [shlex.split(l) for l in proc.stdout.splitlines() if l.startswith("  ")]
  assert cmds == [["/p/python", "-m", "lcm_jax.main", "--config=configs/mse_1b6.py:tiny",
                   f"--workdir=/tmp/r/e/{i}", "--config.train.num_steps=2",
                   f"--config.optimizer.lr={lr}"] for i, lr in ((1, "1e-3"), (2, "3e-4"))]


def test_jobset_executor_renders_one_tpu_jobset_per_work_unit(tmp_path):
  proc = _cli("--config=configs/mse_1b6.py", "--executor=jobset", "--root=gs://b/runs",
              "--name=sw", "--sweep=optimizer.lr=1e-3,3e-4", f"--manifest_dir={tmp_path}",
              "--gke_args=tpu --image=reg/img:1 --accelerator=tpu-v5p-slice --topology=4x4x4",
              "--env=FOO=bar", "--", "--config.mesh.fsdp=64")
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["sw-1.yaml", "sw-2.yaml"]
  for wid, lr in ((1, "1e-3"), (2, "3e-4")):
    assert f"kubectl apply -f {tmp_path}/sw-{wid}.yaml" in proc.stdout
    js = yaml.safe_load((tmp_path / f"sw-{wid}.yaml").read_text())
    assert js["kind"] == "JobSet" and js["metadata"]["name"] == f"sw-{wid}"
    [rj] = js["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["template"]["spec"]["parallelism"] == 16  # 4x4x4 = 64 chips / 4 per host
    [c] = pod["containers"]
    assert c["image"] == "reg/img:1"
    assert c["command"][:5] == ["python", "-m", "lcm_jax.main", "--config=configs/mse_1b6.py",
                                f"--workdir=gs://b/runs/sw/{wid}"]
    assert "--config.mesh.fsdp=64" in c["command"] and f"--config.optimizer.lr={lr}" in c["command"]
    assert {"name": "FOO", "value": "bar"} in c["env"]


# ------------------------------------------------------------------------------------------------
# With XManager (LCM_XM_PYTHON)

@needs_xm
def test_xm_local_sweep_trains_each_work_unit_in_its_own_workdir(tmp_path):
  """A real 2-point sweep on XManager's local executor: 2 steps each, separate workdirs.

  Oracle for "the right override reached the right workdir": with warmup from 0 over 10 steps,
  the learning rate logged at step 2 (one completed update) is lr / 10.
  """
  data = tmp_path / "syn"
  subprocess.run([sys.executable, "-m", "data_prep.synthetic", f"--out={data}", "--num_docs=200",
                  "--dim=32", "--seed=0"], check=True, cwd=ROOT, capture_output=True)
  root = tmp_path / "xm"
  proc = _cli("--config=configs/mse_1b6.py:tiny", f"--root={root}", "--name=sweep",
              f"--python={sys.executable}", "--sweep=optimizer.lr=1e-3,4e-4", "--",
              "--config.train.num_steps=2", f"--config.data.train={data}",
              "--config.optimizer.warmup_steps=10", "--config.optimizer.warmup_init_lr=0.0",
              "--config.train.eval_batches=1", python=XM_PYTHON, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  recorded = json.loads((root / "sweep" / "work_units.json").read_text())
  assert [u["overrides"] for u in recorded["work_units"]] == [
      {"config.optimizer.lr": "1e-3"}, {"config.optimizer.lr": "4e-4"}]
  for wid, lr in ((1, 1e-3), (2, 4e-4)):
    workdir = root / "sweep" / str(wid)
    assert (workdir / "checkpoints" / "2").is_dir(), sorted(os.listdir(workdir))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    [train_row] = [r for r in rows if "train/lr" in r]
    assert train_row["step"] == 2
    assert train_row["train/lr"] == pytest.approx(lr / 10, rel=1e-5)


@needs_xm
def test_xm_local_failed_work_unit_fails_the_launch(tmp_path):
  proc = _cli("--config=configs/mse_1b6.py:tiny", f"--root={tmp_path}", "--name=bad",
              f"--python={sys.executable}", "--", "--config.train.num_steps=abc",
              python=XM_PYTHON, timeout=300)
  assert proc.returncode == 1
  # The work unit (lcm_jax.main) refuses the bad value with exit 2; the launch reports it.
  assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
      next(l for l in proc.stderr.splitlines() if "returned non-zero code: 2" in l)]


@needs_xm
def test_xm_kubernetes_executor_resources(tmp_path):
  """XManager's Kubernetes executor gets the GPU/CPU/memory limits; GKE node selectors only for
  the GPU types whose nvidia-tesla-* label exists (no cluster needed)."""
  code = textwrap.dedent("""
      import argparse, json
      from xmanager import xm, xm_local
      from xmanager.cloud import kubernetes as k
      from launch import xm_launch as xl
      out = []
      for gpus, gpu_type in ((8, "h100"), (2, "a100"), (0, "h100")):
        ns = argparse.Namespace(gpus=gpus, gpu_type=gpu_type, cpu=16, memory_gib=64)
        e = xl.k8s_executor(xm, xm_local, ns)
        out.append([k.requirements_from_executor(e).limits, k.node_selector_from_executor(e)])
      print(json.dumps(out))
  """)
  proc = subprocess.run([XM_PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  mem = str(64 * 2**30)
  assert json.loads(proc.stdout.splitlines()[-1]) == [
      [{"nvidia.com/gpu": "8", "cpu": "16", "memory": mem}, {}],
      [{"nvidia.com/gpu": "2", "cpu": "16", "memory": mem},
       {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}],
      [{"cpu": "16", "memory": mem}, {}]]
