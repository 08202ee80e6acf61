"""Test setup: 8 fake CPU devices, no model hub, repository root importable."""

import os
import sys

import pytest

# 8 fake devices; a collective waits up to 10 min for a device thread that a busy 2-core machine
# has not scheduled (XLA's default, 40 s, aborts the process under load).
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
# torch on a shared 2-core machine: spinning OpenMP threads slow every other test down.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def torch_one_thread():
  """Tiny torch models run ~10x faster single-threaded on a busy 2-core machine. Use with
  ``pytestmark = pytest.mark.usefixtures("torch_one_thread")`` in a module."""
  import torch  # pylint: disable=g-import-not-at-top  (only the data_prep tests need torch)
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)
