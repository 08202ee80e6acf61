# lcm_jax training image for Cloud TPU VMs / GKE TPU slices (no ENTRYPOINT: the command comes from
# the manifest, e.g. python -m lcm_jax.main --config=configs/mse_1b6.py --workdir=gs://...).
#   docker build -f launch/docker/train-tpu.Dockerfile -t REGISTRY/lcm-jax-train-tpu:TAG .
# jax[tpu]==0.10.2 pulls libtpu 0.0.42.* (on PyPI; the find-links page is the documented fallback).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The accelerator runtime first: this layer survives source changes.
RUN pip install "jax[tpu]==0.10.2" \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html

COPY pyproject.toml README.md ./
COPY lcm_jax ./lcm_jax
COPY lcm_interop ./lcm_interop
COPY configs ./configs
COPY data_prep ./data_prep
COPY launch ./launch
# The JAX core with the pins of pyproject.toml (jax/jaxlib already satisfied above).
RUN pip install .
